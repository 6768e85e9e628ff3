{{/* Chart name, overridable. */}}
{{- define "tenantsync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name; role suffixes are appended to it, so keep room for them. */}}
{{- define "tenantsync.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tenantsync.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/). */}}
{{- define "tenantsync.labels" -}}
helm.sh/chart: {{ include "tenantsync.chart" . }}
{{ include "tenantsync.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tenantsync
{{- end }}

{{- define "tenantsync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tenantsync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one role's objects. Call with (dict "ctx" $ "component" "worker"). */}}
{{- define "tenantsync.componentLabels" -}}
{{ include "tenantsync.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tenantsync.componentSelectorLabels" -}}
{{ include "tenantsync.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tenantsync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tenantsync.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tenantsync.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* True (non-empty) when an autoscaler, not the Deployment, owns the worker replica count. */}}
{{- define "tenantsync.workerAutoscaled" -}}
{{- if or .Values.worker.autoscaling.enabled .Values.worker.autoscaling.keda.enabled }}true{{ end }}
{{- end }}

{{/*
One env var read from a Secret by reference. The chart never sees the value.
Call with (dict "ctx" $ "env" "DATABASE_URL" "ref" .Values.secrets.databaseUrl).
*/}}
{{- define "tenantsync.secretEnv" -}}
{{- $name := .ref.name | default .ctx.Values.secrets.existingSecret | default (include "tenantsync.fullname" .ctx) -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ $name | quote }}
      key: {{ .ref.key | quote }}
      {{- if .ref.optional }}
      optional: true
      {{- end }}
{{- end }}

{{/* Environment shared by coordinators and workers. */}}
{{- define "tenantsync.runtimeEnv" -}}
{{ include "tenantsync.secretEnv" (dict "ctx" . "env" "DATABASE_URL" "ref" .Values.secrets.databaseUrl) }}
{{ include "tenantsync.secretEnv" (dict "ctx" . "env" "SOURCE_DATABASE_URL" "ref" .Values.secrets.sourceDatabaseUrl) }}
{{ include "tenantsync.secretEnv" (dict "ctx" . "env" "REDIS_URL" "ref" .Values.secrets.redisUrl) }}
{{ include "tenantsync.secretEnv" (dict "ctx" . "env" "TENANTSYNC_MASTER_KEY" "ref" .Values.secrets.masterKey) }}
{{ include "tenantsync.commonEnv" . }}
- name: TENANTSYNC_METRICS_ADDR
  value: {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | quote }}
- name: TENANTSYNC_SHUTDOWN_GRACE_MS
  value: {{ mul (int .Values.shutdown.graceSeconds) 1000 | quote }}
{{- if not (kindIs "invalid" .Values.config.leaseTtlMs) }}
- name: TENANTSYNC_LEASE_TTL_MS
  value: {{ int .Values.config.leaseTtlMs | quote }}
{{- end }}
{{- if .Values.config.bigqueryEmulatorHost }}
- name: BIGQUERY_EMULATOR_HOST
  value: {{ .Values.config.bigqueryEmulatorHost | quote }}
{{- end }}
{{- if .Values.impersonator.secretName }}
- name: TENANTSYNC_IMPERSONATOR_KEY_FILE
  value: {{ printf "/var/run/secrets/tenantsync/impersonator/%s" .Values.impersonator.key | quote }}
{{- end }}
{{- if .Values.impersonator.iamCredentialsUrl }}
- name: TENANTSYNC_IAM_CREDENTIALS_URL
  value: {{ .Values.impersonator.iamCredentialsUrl | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Logging env, also given to the migrations Job. */}}
{{- define "tenantsync.commonEnv" -}}
- name: TENANTSYNC_LOG
  value: {{ .Values.config.log | quote }}
- name: TENANTSYNC_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
{{- end }}

{{- define "tenantsync.terminationGracePeriodSeconds" -}}
{{- add (int .Values.shutdown.graceSeconds) (int .Values.shutdown.marginSeconds) }}
{{- end }}

{{/* Pod-level security context: the image's non-root user, default seccomp profile. */}}
{{- define "tenantsync.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "tenantsync.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "tenantsync.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- end }}
