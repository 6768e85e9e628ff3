{{/*
A role's Deployment. Call with (dict "ctx" $ "component" "worker" "role" .Values.worker
"replicas" true|false). Coordinators and workers run the same image and env; only the
subcommand, the replica count and the scheduling knobs differ.
*/}}
{{- define "tenantsync.deployment" -}}
{{- $ctx := .ctx }}
{{- $role := .role }}
{{- $sel := dict "ctx" $ctx "component" .component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "tenantsync.fullname" $ctx }}-{{ .component }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "tenantsync.componentLabels" $sel | nindent 4 }}
spec:
  {{- if .replicas }}
  replicas: {{ $role.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "tenantsync.componentSelectorLabels" $sel | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "tenantsync.componentLabels" $sel | nindent 8 }}
        {{- with $role.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $role.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "tenantsync.serviceAccountName" $ctx }}
      automountServiceAccountToken: false
      {{- with $ctx.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $role.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ include "tenantsync.terminationGracePeriodSeconds" $ctx }}
      securityContext:
        {{- include "tenantsync.podSecurityContext" $ctx | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "tenantsync.image" $ctx | quote }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          args: [{{ .component | quote }}]
          env:
            {{- include "tenantsync.runtimeEnv" $ctx | nindent 12 }}
            {{- if and (eq .component "worker") (not (kindIs "invalid" $role.concurrency)) }}
            - name: TENANTSYNC_CONCURRENCY
              value: {{ int $role.concurrency | quote }}
            {{- end }}
          ports:
            - name: metrics
              containerPort: {{ $ctx.Values.metrics.port }}
              protocol: TCP
          {{- include "tenantsync.probes" $ctx | nindent 10 }}
          resources:
            {{- toYaml $role.resources | nindent 12 }}
          securityContext:
            {{- include "tenantsync.containerSecurityContext" $ctx | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if $ctx.Values.impersonator.secretName }}
            - name: impersonator
              mountPath: /var/run/secrets/tenantsync/impersonator
              readOnly: true
            {{- end }}
      volumes:
        # The root filesystem is read-only; this is the one writable place.
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- if $ctx.Values.impersonator.secretName }}
        # The deployment's own key, for keyless tenants (TENANTSYNC_IMPERSONATOR_KEY_FILE).
        - name: impersonator
          secret:
            secretName: {{ $ctx.Values.impersonator.secretName | quote }}
            items:
              - key: {{ $ctx.Values.impersonator.key | quote }}
                path: {{ $ctx.Values.impersonator.key | quote }}
            defaultMode: 0400
        {{- end }}
      {{- with $role.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $role.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $role.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $role.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* A role's metrics Service. */}}
{{- define "tenantsync.metricsService" -}}
{{- $ctx := .ctx }}
{{- $sel := dict "ctx" $ctx "component" .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "tenantsync.fullname" $ctx }}-{{ .component }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "tenantsync.componentLabels" $sel | nindent 4 }}
    tenantsync.io/metrics: "true"
  {{- with $ctx.Values.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: ClusterIP
  selector:
    {{- include "tenantsync.componentSelectorLabels" $sel | nindent 4 }}
  ports:
    - name: metrics
      port: {{ $ctx.Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
{{- end }}

{{/* A role's PodDisruptionBudget. Call with (dict "ctx" $ "component" "worker" "pdb" .Values.worker.pdb). */}}
{{- define "tenantsync.pdb" -}}
{{- $ctx := .ctx }}
{{- $sel := dict "ctx" $ctx "component" .component }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "tenantsync.fullname" $ctx }}-{{ .component }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "tenantsync.componentLabels" $sel | nindent 4 }}
spec:
  {{- if hasKey .pdb "minAvailable" }}
  minAvailable: {{ .pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "tenantsync.componentSelectorLabels" $sel | nindent 6 }}
{{- end }}
