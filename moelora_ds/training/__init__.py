"""Training: the Trainer, its optimizer and schedule, DeepSpeed configuration, loss and step guards."""
