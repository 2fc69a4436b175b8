"""blip3v.kernels"""
