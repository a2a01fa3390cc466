"""Writers of tiny random checkpoints in the exact layouts of real InternVL releases (for tests and lessons).

llm.py: the decoder families; vision.py: InternViT; internvl.py: whole InternVL chat checkpoints.
"""
