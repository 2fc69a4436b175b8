"""blip3v.export"""
