from onnx_lowrank.cli import main

main()
