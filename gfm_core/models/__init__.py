"""Backbones (timm student and teacher, local weights only), SimMIM pieces and the task heads."""
