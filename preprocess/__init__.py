"""Reading CT, reorienting, normalising and resampling: each forward step with its inverse."""
