"""recsys.ranking"""
