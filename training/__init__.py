"""Training: LeNet, AlexNet and VGG checkpoints on the embedded or local datasets."""
