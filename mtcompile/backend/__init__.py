"""Backend: Graph -> one Relax IRModule -> TVM executable (lowering, kernel schedules, the memory arena, tuning)."""
