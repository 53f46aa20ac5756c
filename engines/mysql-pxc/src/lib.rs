//! Stratum engine: Percona XtraDB Cluster (Galera).
