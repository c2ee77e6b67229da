"""recsys.models"""
