"""``python -m onnx_perforate``: the command-line tool."""

import sys

from .cli import main

sys.exit(main())
