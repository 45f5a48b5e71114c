"""Frontends: tenant models -> per-tenant Relax (TVM importers) -> our Graph (lift), and the merge of tenant graphs."""
