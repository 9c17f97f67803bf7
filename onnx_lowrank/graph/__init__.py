"""Graph side: loading, normalising, finding decomposable convs and rewriting them (onnx + graphsurgeon)."""
