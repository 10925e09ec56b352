{{/* Full name: the release name, with the chart name unless the release already contains it. */}}
{{- define "mail-oauth-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mail-oauth-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mail-oauth-operator.labels" -}}
{{ include "mail-oauth-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "mail-oauth-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mail-oauth-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The leader election Lease's name (the operator's default; the Role grants this name only). */}}
{{- define "mail-oauth-operator.leaseName" -}}
mail-oauth-operator
{{- end -}}

{{- define "mail-oauth-operator.clusterResourceNamespace" -}}
{{- default .Release.Namespace .Values.clusterResourceNamespace -}}
{{- end -}}

{{/* Rules for the namespaced kinds the operator reads and writes. */}}
{{- define "mail-oauth-operator.namespacedRules" -}}
- apiGroups: ["mailoauth.io"]
  resources: ["mailproviders"]
  verbs: ["get", "list", "watch"]
# patch: a pasted mailoauth.io/authorization-response annotation is removed once consumed.
- apiGroups: ["mailoauth.io"]
  resources: ["mailboxbindings"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["mailoauth.io"]
  resources: ["mailproviders/status", "mailboxbindings/status"]
  verbs: ["get", "patch"]
# Secrets: client secrets and imported refresh tokens are read (get; list and watch of metadata by
# label, to notice changes); published and grant-state Secrets are written by server-side apply
# (create, patch). RBAC cannot narrow these by label, nor create by name: see values.yaml,
# watchNamespaces. No delete or update: owner references clean up.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
