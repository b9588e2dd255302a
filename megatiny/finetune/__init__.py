"""Fine-tuning: classification and instruction SFT."""
