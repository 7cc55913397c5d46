"""The `trl-bapo` training script (`train`) with what it loads by name: datasets (`data`) and rewards (`rewards`)."""
