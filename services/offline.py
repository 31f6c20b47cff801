"""Nothing leaves the machine: every model the product loads is a local folder (the demo's come
from installed packages), so huggingface_hub and transformers must never try a model hub, and
ONNX Runtime (the embedder) must not send its usage telemetry (it looks up
mobile.events.data.microsoft.com a minute after a session starts). Each library reads its
variable when it starts, so every place the product starts a process sets them before that:
the CLI, local Ray's workers, every Serve deployment."""
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ORT_DISABLE_TELEMETRY": "1"}
