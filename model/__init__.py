"""blip3v.model"""
