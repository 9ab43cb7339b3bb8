"""The online loaders: the epoch plan (epochs), the augmentation's random draws
(augment), the sample reader (samples), the DALI and pure-PyTorch backends
(dali_pipes, torch_loader) and the factory the trainer calls (loader)."""
