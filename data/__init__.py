"""blip3v.data"""
