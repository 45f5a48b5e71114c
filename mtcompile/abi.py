"""The contract between lowering and the runtime, below both: the names of a bundle's
entries, the event points its stream functions call, the bounds check's message and the
record of run_all's stream functions (the manifest carries it; its format is
`mtcompile.runtime.manifest.FORMAT`). Lowering emits these names, the runtime calls them."""

from __future__ import annotations

from dataclasses import dataclass

RUN_ALL = "run_all"  # entry that runs every tenant: all inputs in, all outputs out (flat)
RUN_SOME = "run_some"  # prefix of a merged call over a subset of tenants (run_some__a__b)
MANIFEST_FN = "mtcompile_manifest"  # zero-argument entry returning the manifest as uint8 JSON
ARENA_FN = f"{RUN_ALL}__arena"  # zero-argument entry: a fresh storage of run_all's arena size


def subset_function(tenants) -> str:
    """The name of the merged function over `tenants` (in bundle order): ``run_some__a__b``."""
    return "__".join((RUN_SOME, *tenants))


# Event points inside the stream functions (``R.call_packed`` names; the executor registers
# them): ``signal(event id)`` after the producer's kernel, ``wait(event id)`` before the
# consumer's; a value crossing streams is ``put(value id, tensor)`` right after the producer
# computes it and ``get(value id) -> tensor`` in the consumer, after the waits that order them
SIGNAL = "mtcompile.streams.signal"
WAIT = "mtcompile.streams.wait"
PUT = "mtcompile.streams.put"
GET = "mtcompile.streams.get"

# The message of a bounds check lowering puts in the generated code starts with this; the
# runtime raises `mtcompile.errors.IndexOutOfRangeError` with the rest of it (mtcompile-run
# prints the rest and exits 3: its `failed_check` spells both markers again)
INDEX_CHECK = "mtcompile.IndexOutOfRange:"
# ... and of a check that an integer divisor is not 0 (`mtcompile.errors.DivisionByZeroError`)
DIVISION_CHECK = "mtcompile.DivisionByZero:"


@dataclass(frozen=True)
class StreamFunctions:
    """What the runtime needs to run ``run_all`` on its stream functions: their names, the
    arena entry, events (and each one's signalling and waiting stream), each stream's
    run_all inputs and flat outputs (indices), a label per stream and kernel -> tenant."""

    functions: tuple[str, ...]
    arena_function: str
    num_events: int
    event_streams: tuple[tuple[int, int], ...]
    stream_inputs: tuple[tuple[int, ...], ...]
    stream_outputs: tuple[tuple[int, ...], ...]
    stream_tenants: tuple[str, ...]
    kernel_tenant: dict[str, str]
