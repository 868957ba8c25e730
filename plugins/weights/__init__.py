"""Built-in weight sources: the Hugging Face hub, timm's pretrained tags and torchvision's weights."""
