//! Rendering the Helm chart in `deploy/chart` without helm.
//!
//! The chart's templates use only three expression forms, which this module
//! substitutes exactly as `helm template` would:
//!
//! - `{{ .Values.a.b }}`: the scalar at path `a.b` of `values.yaml`;
//! - `{{ .Release.Namespace }}`: the release namespace ([`RELEASE_NAMESPACE`]);
//! - `{{ .Chart.AppVersion }}`: `appVersion` of `Chart.yaml`.
//!
//! Anything else between `{{` and `}}` is an error, as is a missing value, so
//! the chart stays renderable both ways. `values.yaml` and `Chart.yaml` are
//! read by a small parser for nested maps of scalars (no lists, no flow
//! collections, no multi-line scalars except folded `>-` blocks, which are
//! skipped). `cargo xtask render-deploy` writes the result to
//! [`RENDERED_PATH`], and a test checks that the checked-in file is current.
//!
//! This file depends on the standard library only: `xtask` compiles it in
//! with `#[path]` rather than linking `mesh-lab`.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

/// The namespace the chart is installed into (Istio's root namespace).
pub const RELEASE_NAMESPACE: &str = "istio-system";

/// The chart's directory, relative to the workspace root.
pub const CHART_DIR: &str = "deploy/chart";

/// The rendered manifests, relative to the workspace root.
pub const RENDERED_PATH: &str = "deploy/rendered/mesh.yaml";

/// Why the chart could not be rendered.
#[derive(Debug)]
pub struct RenderError {
    /// The file at fault.
    pub file: PathBuf,
    /// Its 1-based line, when one is at fault.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for RenderError {}

fn error(file: &Path, line: Option<usize>, message: impl Into<String>) -> RenderError {
    RenderError {
        file: file.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// The scalars of a YAML file of nested maps, by dotted path (`a.b.c`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values {
    scalars: BTreeMap<String, String>,
    maps: Vec<String>,
}

impl Values {
    /// Parses `text` (the contents of `file`, named in errors).
    pub fn parse(file: &Path, text: &str) -> Result<Self, RenderError> {
        let mut values = Self::default();
        // Open maps: (indentation of their keys, dotted path).
        let mut open: Vec<(usize, String)> = Vec::new();
        // Indentation below which a block scalar (`>-`, `|`) ends.
        let mut block_scalar: Option<usize> = None;
        for (index, raw) in text.lines().enumerate() {
            let line_no = Some(index + 1);
            let trimmed = raw.trim_start_matches(' ');
            let indent = raw.len() - trimmed.len();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if let Some(parent) = block_scalar {
                if indent > parent {
                    continue;
                }
                block_scalar = None;
            }
            if trimmed.starts_with('\t') {
                return Err(error(file, line_no, "tabs are not allowed in indentation"));
            }
            if trimmed == "---" {
                continue;
            }
            if trimmed.starts_with("- ") || trimmed == "-" {
                return Err(error(file, line_no, "lists are not supported"));
            }
            let Some((key, rest)) = split_key(trimmed) else {
                return Err(error(file, line_no, "expected `key: value`"));
            };
            while open.last().is_some_and(|(level, _)| indent <= *level) {
                open.pop();
            }
            let path = match open.last() {
                Some((_, parent)) => format!("{parent}.{key}"),
                None => key.to_owned(),
            };
            let value = strip_comment(rest).trim();
            if value.is_empty() {
                values.maps.push(path.clone());
                open.push((indent, path));
            } else if value.starts_with('>') || value.starts_with('|') {
                block_scalar = Some(indent);
            } else if value.starts_with('[') || value.starts_with('{') {
                return Err(error(file, line_no, "flow collections are not supported"));
            } else {
                values.scalars.insert(path, unquote(value).to_owned());
            }
        }
        Ok(values)
    }

    /// The scalar at dotted `path`, if there is one.
    pub fn get(&self, path: &str) -> Option<&str> {
        self.scalars.get(path).map(String::as_str)
    }

    /// Whether `path` names a map (not a scalar).
    pub fn is_map(&self, path: &str) -> bool {
        self.maps.iter().any(|map| map == path)
    }
}

/// `key: rest` of a mapping line; `None` when the line is not one.
fn split_key(line: &str) -> Option<(&str, &str)> {
    let colon = line
        .find(": ")
        .or_else(|| line.ends_with(':').then(|| line.len() - 1))?;
    let key = line[..colon].trim();
    if key.is_empty() || key.contains(' ') {
        return None;
    }
    Some((unquote(key), &line[colon + 1..]))
}

/// `value` without a trailing ` # comment` (outside quotes).
fn strip_comment(value: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    for (index, c) in value.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && previous.is_whitespace() => return &value[..index],
            None => {}
        }
        previous = c;
    }
    value
}

/// `value` without surrounding quotes.
fn unquote(value: &str) -> &str {
    for quote in ['"', '\''] {
        if value.len() >= 2 && value.starts_with(quote) && value.ends_with(quote) {
            return &value[1..value.len() - 1];
        }
    }
    value
}

/// What the templates' expressions resolve against.
#[derive(Debug, Clone)]
pub struct RenderContext {
    /// `values.yaml`.
    pub values: Values,
    /// `{{ .Release.Namespace }}`.
    pub namespace: String,
    /// `{{ .Chart.AppVersion }}`.
    pub app_version: String,
}

/// Renders one template (`file` names it in errors).
pub fn render_template(
    file: &Path,
    text: &str,
    context: &RenderContext,
) -> Result<String, RenderError> {
    let mut out = String::with_capacity(text.len());
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_no = Some(index + 1);
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                return Err(error(file, line_no, "`{{` without `}}` on the same line"));
            };
            let expression = after[..end].trim();
            out.push_str(&evaluate(expression, context).map_err(|m| error(file, line_no, m))?);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

fn evaluate(expression: &str, context: &RenderContext) -> Result<String, String> {
    match expression {
        ".Release.Namespace" => Ok(context.namespace.clone()),
        ".Chart.AppVersion" => Ok(context.app_version.clone()),
        _ => {
            let Some(path) = expression.strip_prefix(".Values.") else {
                return Err(format!(
                    "unsupported expression `{{{{ {expression} }}}}`: only .Values.<path>, \
                     .Release.Namespace and .Chart.AppVersion"
                ));
            };
            if let Some(value) = context.values.get(path) {
                Ok(value.to_owned())
            } else if context.values.is_map(path) {
                Err(format!("`.Values.{path}` is a map, not a scalar"))
            } else {
                Err(format!("`.Values.{path}` is not set in values.yaml"))
            }
        }
    }
}

/// Renders the chart in `chart_dir` with its `values.yaml` into one
/// multi-document YAML stream, templates in file-name order, each preceded by
/// a `# Source:` comment as `helm template` prints.
pub fn render_chart(chart_dir: &Path, namespace: &str) -> Result<String, RenderError> {
    render_parts(chart_dir, namespace).map(|(main, _)| main)
}

/// Where the chart's Helm hooks are rendered: templates that carry a
/// `helm.sh/hook` annotation run only under `helm install/uninstall`, so
/// they are kept out of [`RENDERED_PATH`] (which `kubectl apply` and
/// `meshctl install` apply as is: a pre-delete Job there would run at
/// install time).
pub const HOOKS_PATH: &str = "deploy/rendered/helm-hooks.yaml";

/// Renders the chart's hook templates only (see [`HOOKS_PATH`]).
pub fn render_hooks(chart_dir: &Path, namespace: &str) -> Result<String, RenderError> {
    render_parts(chart_dir, namespace).map(|(_, hooks)| hooks)
}

/// The chart's templates rendered: (everything but hooks, hooks).
fn render_parts(chart_dir: &Path, namespace: &str) -> Result<(String, String), RenderError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|err| error(path, None, err.to_string()))
    };
    let chart_file = chart_dir.join("Chart.yaml");
    let chart = Values::parse(&chart_file, &read(&chart_file)?)?;
    let name = chart
        .get("name")
        .ok_or_else(|| error(&chart_file, None, "no `name`"))?
        .to_owned();
    let app_version = chart
        .get("appVersion")
        .ok_or_else(|| error(&chart_file, None, "no `appVersion`"))?
        .to_owned();
    let values_file = chart_dir.join("values.yaml");
    let context = RenderContext {
        values: Values::parse(&values_file, &read(&values_file)?)?,
        namespace: namespace.to_owned(),
        app_version,
    };

    let templates_dir = chart_dir.join("templates");
    let mut templates = std::fs::read_dir(&templates_dir)
        .map_err(|err| error(&templates_dir, None, err.to_string()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| error(&templates_dir, None, err.to_string()))?;
    templates.retain(|path| {
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let file_name = file_name.unwrap_or_default();
        // Helm renders `*.yaml`/`*.yml`, never partials (`_*`).
        (file_name.ends_with(".yaml") || file_name.ends_with(".yml")) && !file_name.starts_with('_')
    });
    templates.sort();

    let header = format!(
        "# Generated by `cargo xtask render-deploy` from {CHART_DIR} (chart {name}, \
         release namespace {namespace}); do not edit.\n"
    );
    let (mut out, mut hooks) = (header.clone(), header);
    for template in templates {
        let text = read(&template)?;
        let rendered = render_template(&template, &text, &context)?;
        let file_name = template.file_name().unwrap_or_default().to_string_lossy();
        let target = if rendered.contains("helm.sh/hook:") {
            &mut hooks
        } else {
            &mut out
        };
        target.push_str(&format!("---\n# Source: {name}/templates/{file_name}\n"));
        target.push_str(rendered.trim_end());
        target.push('\n');
    }
    Ok((out, hooks))
}

/// Renders the chart of the workspace at `root` into the rendered file's
/// text; see [`render_chart`].
pub fn render_workspace(root: &Path) -> Result<String, RenderError> {
    render_chart(&root.join(CHART_DIR), RELEASE_NAMESPACE)
}

/// Renders the hooks of the workspace's chart; see [`HOOKS_PATH`].
pub fn render_workspace_hooks(root: &Path) -> Result<String, RenderError> {
    render_hooks(&root.join(CHART_DIR), RELEASE_NAMESPACE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> RenderContext {
        let values = Values::parse(
            Path::new("values.yaml"),
            "a:\n  b: \"x y\" # note\n  c:\n    d: 3\ne: plain\n",
        )
        .unwrap();
        RenderContext {
            values,
            namespace: "ns".into(),
            app_version: "1.2.3".into(),
        }
    }

    #[test]
    fn substitutes_the_three_forms() {
        let out = render_template(
            Path::new("t.yaml"),
            "v: {{ .Values.a.b }}/{{.Values.a.c.d}}\nns: {{ .Release.Namespace }}\ntag: {{ .Chart.AppVersion }} {{ .Values.e }}\n",
            &context(),
        )
        .unwrap();
        assert_eq!(out, "v: x y/3\nns: ns\ntag: 1.2.3 plain\n");
    }

    #[test]
    fn rejects_what_helm_would_not_render_the_same() {
        let ctx = context();
        for bad in [
            "{{ .Values.a.c }}",
            "{{ .Values.missing }}",
            "{{ if .Values.e }}",
            "{{ .Values.e",
        ] {
            assert!(
                render_template(Path::new("t.yaml"), bad, &ctx).is_err(),
                "{bad}"
            );
        }
        assert!(Values::parse(Path::new("v"), "a:\n  - 1\n").is_err());
    }
}
