"""Training: two-stage BLIP-2 pre-training, fine-tuning and evaluation. Writes checkpoints that blip2.load opens;
imports blip2, never the reverse."""
