"""Front ends over the stage API: the CLI (cli, flags), the recipe runner (recipe, pipeline,
report), the one-call Python API (one_call) and the demo's set-up (demo)."""
