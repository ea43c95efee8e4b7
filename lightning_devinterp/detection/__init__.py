"""Lightning-free core: change-point detection on series such as λ̂ or the training loss."""
