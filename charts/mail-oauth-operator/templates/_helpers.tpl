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

{{/* The Secret (in the release namespace) holding the key that signs published Secrets for the
shared relay: made by the operator on first need; delete it to rotate (docs/relay.md). */}}
{{- define "mail-oauth-operator.relaySigningKey" -}}
mail-oauth-operator-relay-signing
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

{{/* The shared relay's pods: labels of their own, so no selector of the operator's takes them. */}}
{{- define "mail-oauth-operator.relaySelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-relay
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mail-oauth-operator.relayLabels" -}}
{{ include "mail-oauth-operator.relaySelectorLabels" . }}
app.kubernetes.io/component: relay
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "mail-oauth-operator.relayServiceAccountName" -}}
{{- if .Values.relay.serviceAccount.create -}}
{{- default (printf "%s-relay" (include "mail-oauth-operator.fullname" .)) .Values.relay.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.relay.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the shared relay serves, comma separated (empty: all). */}}
{{- define "mail-oauth-operator.relayNamespaces" -}}
{{- join "," (default .Values.watchNamespaces .Values.relay.namespaces) -}}
{{- end -}}

{{/* The relay's listeners: name, container port, environment variable, implicit TLS. */}}
{{- define "mail-oauth-operator.relayListeners" -}}
smtp: {port: 2587, env: SMTP_ADDRESS, tls: false}
smtps: {port: 2465, env: SMTPS_ADDRESS, tls: true}
imap: {port: 2143, env: IMAP_ADDRESS, tls: false}
imaps: {port: 2993, env: IMAPS_ADDRESS, tls: true}
pop3: {port: 2110, env: POP3_ADDRESS, tls: false}
pop3s: {port: 2995, env: POP3S_ADDRESS, tls: true}
{{- end -}}
