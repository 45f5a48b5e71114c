"""The contract between lowering and runtime: entry names and the artifact format."""

FORMAT = "mtcompile-bundle/1"  # bump when the manifest or entry layout changes
MANIFEST = "manifest.json"  # readable copy of the manifest, beside the library
RUN_ALL = "run_all"  # entry that runs every tenant: all inputs in, all outputs out (flat)
MANIFEST_FN = "mtcompile_manifest"  # zero-argument entry returning the manifest as uint8 JSON
