"""Fine-tuning with TRL: DPO or SFT with LoRA, merged into a full checkpoint (trainer.py), in the round's
process or launched over several processes with accelerate (job.py, one per rank)."""
