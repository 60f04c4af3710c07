"""Demo training job that trains a small DDP model with a planted NaN fault, with or without nanwatch."""
