"""A saved bundle's files, beside its library (`mtcompile.runtime.artifact` writes and reads
them). The names inside the library, which lowering shares with the runtime, are in
`mtcompile.abi`."""

MANIFEST = "manifest.json"  # readable copy of the manifest, beside the library
