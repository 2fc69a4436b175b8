"""blip3v.calibration"""
