//! PKCS#11 backend on cryptoki.
