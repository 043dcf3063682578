"""The graph passes of the rewriter, one module each, and the op table they share.

- :mod:`.op_table`: what each standard op does to positions (position-wise, grid-preserving...);
  the tuner and the pooling-structure masks read it too.
- :mod:`.surgery`: the graph editor the passes work through, and :class:`Refusal`.
- :mod:`.batchnorm`: fold a following BatchNormalization into the Conv.
- :mod:`.activation`: fuse a following Relu / LeakyRelu / Clip into PerforatedConv.
- :mod:`.interpolate_late`: run position-wise ops before NNInterpolate.
- :mod:`.compact`: keep perforated tensors compact across the graph (docs/compact.md).

A pass that does not apply returns a :class:`Refusal` (its reason and the node at fault).

Nothing is re-exported here, so that importing :mod:`.op_table` alone stays light (no
onnx-graphsurgeon): import from the modules.
"""
