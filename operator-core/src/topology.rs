//! Helpers every engine's topology uses: ordinals of `<cluster>-<ordinal>`
//! instance names and the rolling-update order. Pure.

/// Ordinal from a `<cluster>-<ordinal>` name; names without one sort last.
pub fn ordinal(name: &str) -> u32 {
    name.rsplit_once('-')
        .and_then(|(_, o)| o.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Rolling-update order: every instance but `last` from the highest
/// ordinal down, then `last` (the primary or writer) when it is one of
/// `names`.
pub fn update_order(names: &[String], last: Option<&str>) -> Vec<String> {
    let mut order: Vec<String> = names
        .iter()
        .filter(|n| Some(n.as_str()) != last)
        .cloned()
        .collect();
    order.sort_by_key(|n| std::cmp::Reverse((ordinal(n), n.clone())));
    if let Some(l) = last.filter(|l| names.iter().any(|n| n == l)) {
        order.push(l.to_string());
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_and_order() {
        assert_eq!(ordinal("simple-pg-10"), 10);
        assert_eq!(ordinal("nonumber"), u32::MAX);
        let names: Vec<String> = ["c-0", "c-1", "c-2", "c-10"].map(String::from).into();
        assert_eq!(
            update_order(&names, Some("c-1")),
            ["c-10", "c-2", "c-0", "c-1"]
        );
        assert_eq!(update_order(&names, None), ["c-10", "c-2", "c-1", "c-0"]);
        assert_eq!(
            update_order(&names, Some("gone")),
            ["c-10", "c-2", "c-1", "c-0"]
        );
    }
}
