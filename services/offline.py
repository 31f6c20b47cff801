"""No model hub: every model the product loads is a local folder (the demo's come from installed
packages), so huggingface_hub and transformers must never try the network. Both read these when
first imported: each place the product starts a process sets them before that (the CLI, local
Ray's workers, every Serve deployment)."""
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
