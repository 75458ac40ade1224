"""The ffcv backend: loaders (loader.py), JIT-compiled decoders and orders (ops.py), and the
``.beton`` writer (write.py, ``python -m bip.data.ffcv write``). Importing this package does not
import ffcv; loader.require_ffcv says how to install it."""
