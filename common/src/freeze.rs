//! Which tensors a run freezes: `--freeze` takes parameter-path patterns (`conv1.*,conv2.*`,
//! `*` matches any run of characters) or a preset: `head-only` (everything but the classifier
//! head) or `none`.

use crate::models::ModelSpec;

/// The exact tensor names `spec` freezes in `model`, in the model's order.
pub fn resolve(spec: &str, model: &ModelSpec) -> Result<Vec<String>, String> {
    let names: Vec<String> = model.specs().into_iter().map(|s| s.name).collect();
    let spec = spec.trim();
    match spec {
        "" | "none" => Ok(Vec::new()),
        "head-only" => {
            let head = model.head_prefix().ok_or_else(|| {
                format!(
                    "`freeze = head-only`: model `{}` has no classifier head",
                    model.kind
                )
            })?;
            Ok(names.into_iter().filter(|n| !n.starts_with(head)).collect())
        }
        patterns => {
            let patterns: Vec<&str> = patterns.split(',').map(str::trim).collect();
            for p in &patterns {
                if p.is_empty() {
                    return Err(format!(
                        "`freeze = {spec}`: an empty pattern between commas"
                    ));
                }
                if !names.iter().any(|n| matches(p, n)) {
                    return Err(format!(
                        "`freeze`: pattern `{p}` matches no tensor of model `{}` (its tensors: {})",
                        model.kind,
                        names.join(", ")
                    ));
                }
            }
            let frozen: Vec<String> = names
                .iter()
                .filter(|n| patterns.iter().any(|p| matches(p, n)))
                .cloned()
                .collect();
            if frozen.len() == names.len() {
                return Err(format!(
                    "`freeze = {spec}` freezes every tensor of model `{}`: nothing would train",
                    model.kind
                ));
            }
            Ok(frozen)
        }
    }
}

/// Glob match where `*` matches any run of characters (including dots).
pub fn matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_patterns_and_refusals() {
        let cnn = ModelSpec::parse("cnn", 10).unwrap();
        assert!(resolve("none", &cnn).unwrap().is_empty());
        assert_eq!(
            resolve("head-only", &cnn).unwrap(),
            [
                "conv1.weight",
                "conv1.bias",
                "conv2.weight",
                "conv2.bias",
                "fc1.weight",
                "fc1.bias"
            ]
        );
        assert_eq!(
            resolve("conv1.*, conv2.weight", &cnn).unwrap(),
            ["conv1.weight", "conv1.bias", "conv2.weight"]
        );
        assert_eq!(resolve("*.bias", &cnn).unwrap().len(), 4);
        let e = resolve("conv3.*", &cnn).unwrap_err();
        assert!(e.contains("conv3.*") && e.contains("conv1.weight"), "{e}");
        assert!(
            resolve("*", &cnn)
                .unwrap_err()
                .contains("nothing would train")
        );
        assert!(matches("c*v*.w*", "conv1.weight"));
        assert!(!matches("conv1.*", "conv10"));
    }
}
