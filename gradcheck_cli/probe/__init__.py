"""The probe: a batch through the model forward and backward, with statistics per row."""
