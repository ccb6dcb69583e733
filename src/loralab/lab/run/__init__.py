"""Training one run (or a pack of runs on one shared base): models, data, the loss, the loop, packs, loaded assets."""
