"""Test helpers shipped with the package: tiny real diffusers models built from configs (:mod:`.tiny_models`) and
seeded checkpoint fuzzing (:mod:`.fuzzing`, :mod:`.fuzz_cases`). Used by the test suite and by
``scripts/fuzz_checkpoints.py``; nothing else in the package imports them."""
