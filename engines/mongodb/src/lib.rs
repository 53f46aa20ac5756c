//! Stratum engine: MongoDB.
