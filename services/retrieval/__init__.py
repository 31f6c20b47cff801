"""Input-aware adapter retrieval: embed prompts, find the adapters whose card samples are closest.

Kept import-light (no torch) so that configuration code can read the defaults.
"""

DEFAULT_INSTRUCTION = "Represent the sentence for similar task retrieval: "
# Embedder runtimes of one model: ONNX Runtime with int8 weights, ONNX Runtime float32, PyTorch (the
# reference), PyTorch with bfloat16 weights (fast on CPUs with AMX only).
EMBEDDER_BACKENDS = ("onnx-int8", "onnx", "torch", "bf16")
# the PyTorch vectors at a third of the cost (docs/retrieval.md); on a CPU with AMX, bf16 (host_runtime.py)
DEFAULT_EMBEDDER_BACKEND = "onnx"
DEFAULT_MAX_SEQ_LENGTH = 256
# What `retriever train` writes beside a tuned model: its cards, recipe and the cut it was trained with.
TRAINING_INFO_FILE = "loraretriever_training.json"
