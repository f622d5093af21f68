"""Writers: tensors streamed out to the files we define, atomically.

`safetensors` is the one safetensors writer (a file, Hugging Face shards, a stream
into any file object, bytes); `checkpoint` writes a training checkpoint's three
files (``tensors.safetensors`` through that writer, ``state.json``, ``manifest.json``)
in the layout `safeckpt.format.checkpoint_dir` defines.
"""
