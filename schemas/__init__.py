"""The product contract as code: topics, payload models and their JSON Schemas."""
