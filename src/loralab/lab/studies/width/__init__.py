"""The width study: how the largest stable learning rate of each init moves with the adapted layer's width."""
