"""The contract between lowering and runtime: entry names, event points and file names
(the manifest's format is `mtcompile.runtime.manifest.FORMAT`)."""

MANIFEST = "manifest.json"  # readable copy of the manifest, beside the library
RUN_ALL = "run_all"  # entry that runs every tenant: all inputs in, all outputs out (flat)
MANIFEST_FN = "mtcompile_manifest"  # zero-argument entry returning the manifest as uint8 JSON
ARENA_FN = f"{RUN_ALL}__arena"  # zero-argument entry: a fresh storage of run_all's arena size

# Event points inside the stream functions (``R.call_packed`` names; the executor registers
# them): ``signal(event id)`` after the producer's kernel, ``wait(event id)`` before the
# consumer's; a value crossing streams is ``put(value id, tensor)`` right after the producer
# computes it and ``get(value id) -> tensor`` in the consumer, after the waits that order them
SIGNAL = "mtcompile.streams.signal"
WAIT = "mtcompile.streams.wait"
PUT = "mtcompile.streams.put"
GET = "mtcompile.streams.get"

# The message of a bounds check lowering puts in the generated code starts with this; the
# runtime raises `mtcompile.errors.IndexOutOfRangeError` with the rest of it
INDEX_CHECK = "mtcompile.IndexOutOfRange:"
