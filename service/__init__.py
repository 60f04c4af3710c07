"""service"""
Y=2
