"""blip3v.runtime"""
