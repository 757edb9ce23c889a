"""Datasets and the pretraining views: in-memory tensors augmented on the device, image folders
cropped in loader workers and coloured on the device, and the augmentation recipes."""
