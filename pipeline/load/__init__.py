"""The online loaders: the epoch plan (epochs), the augmentation's random draws
(augment), the sample reader (samples), the DALI and pure-PyTorch backends
(dali_pipes, torch_loader) on their shared base (base), and the factory the trainer
calls (loader); interface holds the choices and protocols, without heavy imports."""
