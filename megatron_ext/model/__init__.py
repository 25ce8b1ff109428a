"""Model building blocks plugged into megatron-core through layer specs."""
